from charlm.export.command import main

main()
