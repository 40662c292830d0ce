"""The local web console for site staff: pages, forms, live alerts, languages (see docs/console.md)."""
