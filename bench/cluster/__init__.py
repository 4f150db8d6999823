"""Scale-out benchmark (issue 9): run it as ``python -m bench.cluster``; see __main__.py."""
