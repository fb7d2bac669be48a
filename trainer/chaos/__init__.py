"""Failure injection: scenarios and their plan (``scenario``), the driver that applies them
to a run (``driver``), the networks that can fail (``netns`` hosts, the ``proxy``), and the
robustness report a chaos run ends with (``report``)."""
