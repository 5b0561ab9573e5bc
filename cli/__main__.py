from vecpipe.cli import main

main()
