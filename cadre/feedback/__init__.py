"""Feedback: the store of served responses and user corrections, and what is learnt from them."""
