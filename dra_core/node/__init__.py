"""The node side of DRA: preparing and unpreparing claims, and start-up reconciliation."""
