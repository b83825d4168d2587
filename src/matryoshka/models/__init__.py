"""Models: the Matryoshka heads (MRL, MRL-E), the image classifier, the text encoder and the post-hoc adaptor."""
