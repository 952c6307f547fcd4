"""The words every stage speaks: statuses, the layout, the run's folder, model shapes, the trainer's files."""
