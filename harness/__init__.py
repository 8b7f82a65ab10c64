"""The locked evaluation harness. Nothing in this package may be edited by the agent."""
