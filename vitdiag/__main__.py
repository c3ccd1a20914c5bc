from vitdiag.cli import main

main()
