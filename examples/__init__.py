"""Example applications served by ``make run`` and the process tests; imports nothing."""
