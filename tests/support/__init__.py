"""What many test modules build the same way: images for requests (``images``)."""
