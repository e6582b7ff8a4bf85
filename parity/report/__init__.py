"""Rendering: console, report.json, Markdown, HTML, JUnit and plots. No math happens here."""
