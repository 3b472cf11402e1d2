"""meshplan planner: specs from files, search, ILP, plan files, reports and the CLI."""
