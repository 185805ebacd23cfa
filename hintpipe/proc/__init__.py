"""Paired guest and host processes: shared guest RAM, round barriers, the two process drivers."""
