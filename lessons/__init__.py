"""Lessons a course can hand out: a page of text, a stub to fill in and a grader for each."""
