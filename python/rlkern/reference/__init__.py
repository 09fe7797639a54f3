"""Plain-PyTorch references: the readable specification of every rlkern op.

They favour clarity over speed (explicit loops where the math is a recurrence) and run
in whatever dtype they are given; the tests run them in float64.
"""
