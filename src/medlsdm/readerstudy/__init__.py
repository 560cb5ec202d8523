"""Human evaluation: a blinded reader study built from real and synthetic volumes, shown in a
browser, and the statistics of its answers."""
