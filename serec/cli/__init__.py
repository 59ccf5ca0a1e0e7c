"""The command-line front ends of the workflow's steps: argparse, one call into serec, where the
results went, an ExitStatus. The top-level scripts (the thesis' names), the console entry
points of pyproject.toml and serec.pipeline all run these `main(argv)` functions."""
