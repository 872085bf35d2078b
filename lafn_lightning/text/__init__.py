"""Text rules shared by training and inference: scripts without spaces, subject matching, token spans."""
