"""Defences in front of the model: the guard (LSI, ECSO, LSI then ECSO) and ECSO itself."""
