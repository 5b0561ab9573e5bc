from vecpipe.cli.app import main

main()
