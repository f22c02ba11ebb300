"""HTTP routes of the web view and the JSON API, one module per area."""
