from vhostctl.cli import main

main()
