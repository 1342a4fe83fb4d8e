from netstack.cli.app import main

raise SystemExit(main())
