from slmtui.cli import main

raise SystemExit(main())
