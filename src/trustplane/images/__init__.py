"""Image workflows: encrypt, decrypt, inspect; which layers are sensitive;
tiers of access."""
