"""BertModel's forward pass (inference) in torch, from the weights alone: core.bert_encoder's
second forward, for the folders it runs. Only torch is imported, not transformers or
sentence-transformers (whose imports are most of a short embed's time); the attention is
torch's scaled_dot_product_attention, as transformers' own BERT uses, so the vectors are
sentence-transformers' to float rounding at the speed of its torch backend.
"""
from __future__ import annotations

import math

PRECISIONS = ("float32", "bfloat16")


class TorchBert:
    """Called like core.bert_encoder.Bert: numpy token ids and mask in, float32 numpy token
    embeddings out; weights and activations in `precision` (float32 or bfloat16)."""

    def __init__(self, config: dict, weight_named, precision: str = "float32"):
        """`weight_named(key)`: the BertModel weight of that name (bert_encoder.bert_weight)."""
        import torch

        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[precision]

        def weight(key):
            return weight_named(key).to(dtype).contiguous()

        self.heads = config["num_attention_heads"]
        self.eps = config["layer_norm_eps"]
        self.word = weight("embeddings.word_embeddings.weight")
        self.position = weight("embeddings.position_embeddings.weight")
        self.token_type = weight("embeddings.token_type_embeddings.weight")[0]
        self.embed_norm = (weight("embeddings.LayerNorm.weight"),
                           weight("embeddings.LayerNorm.bias"))

        def linear(*keys):  # several projections of one input as one matrix product
            return (torch.cat([weight(key + ".weight") for key in keys]),
                    torch.cat([weight(key + ".bias") for key in keys]))

        self.layers = []
        for i in range(config["num_hidden_layers"]):
            p = f"encoder.layer.{i}."
            self.layers.append({
                "qkv": linear(*(p + "attention.self." + name
                                for name in ("query", "key", "value"))),
                "attention_out": linear(p + "attention.output.dense"),
                "attention_norm": (weight(p + "attention.output.LayerNorm.weight"),
                                   weight(p + "attention.output.LayerNorm.bias")),
                "intermediate": linear(p + "intermediate.dense"),
                "output": linear(p + "output.dense"),
                "output_norm": (weight(p + "output.LayerNorm.weight"),
                                weight(p + "output.LayerNorm.bias")),
            })

    def __call__(self, input_ids, attention_mask, layers: int | None = None):
        """Token embeddings (batch x tokens x hidden, float32 numpy) after the first `layers`
        layers (None: all), right-padded inputs."""
        import torch
        import torch.nn.functional as F

        with torch.inference_mode():
            ids = torch.from_numpy(input_ids)
            length = ids.shape[1]
            x = F.embedding(ids, self.word) + self.position[:length] + self.token_type
            x = F.layer_norm(x, x.shape[-1:], *self.embed_norm, self.eps)
            attends = torch.from_numpy(attention_mask).bool()[:, None, None, :]
            for layer in self.layers[:layers]:
                x = self._layer(x, layer, attends)
            return x.float().numpy()

    def _layer(self, x, layer, attends):
        import torch.nn.functional as F

        batch, length, hidden = x.shape
        width = hidden // self.heads
        qkv = F.linear(x, *layer["qkv"]).view(batch, length, 3, self.heads, width)
        query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        context = F.scaled_dot_product_attention(query, key, value, attn_mask=attends,
                                                 scale=1.0 / math.sqrt(width))
        context = context.transpose(1, 2).reshape(batch, length, hidden)
        x = F.layer_norm(F.linear(context, *layer["attention_out"]) + x, (hidden,),
                         *layer["attention_norm"], self.eps)
        inner = F.gelu(F.linear(x, *layer["intermediate"]))
        return F.layer_norm(F.linear(inner, *layer["output"]) + x, (hidden,),
                            *layer["output_norm"], self.eps)
