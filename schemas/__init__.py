"""JSON schemas of the appliance's outputs, shipped as package data."""
