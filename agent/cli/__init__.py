"""The ``edge-agent`` command line: ``main`` parses and dispatches, one module per command family.

Every command is a function that returns an exit code. Heavy modules (numpy, onnxruntime, the
pipeline) are imported inside the command that needs them, so ``--help`` and the control
commands start fast. The top of the import graph: may import any package of the agent.
"""
