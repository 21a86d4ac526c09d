"""The protocol between a site and the coordinator: round plans, the names on the wire, the secure sum's checks."""
