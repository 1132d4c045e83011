"""Knowing when not to answer: referral rules, the tissue check, and the answer each image gets."""
