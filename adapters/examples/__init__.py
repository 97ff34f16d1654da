"""Runnable examples of plugging gali-ext into existing training code."""
