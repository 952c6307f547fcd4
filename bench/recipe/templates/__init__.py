"""Recipe templates shipped as package data."""
