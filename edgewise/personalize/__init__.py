"""Personalization: a language model learns its user's writing on the device, inside a memory budget (`edgewise tune`)."""
