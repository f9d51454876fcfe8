"""The bottom layer: errors, contracts, hashing and the module graph; imports nothing else of vlmforge."""
