"""Studies: experiments built from the library's tools, run by a command (`tta-surgical report`)."""
