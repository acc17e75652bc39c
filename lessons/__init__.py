"""Lessons a course can hand out: a page of text, a stub to fill in and a grader for each
(see lessons/README.md), and hypergrad.py, the measurement that goes with lesson 6."""
