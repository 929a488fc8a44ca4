from iqpir.cli import main

raise SystemExit(main())
