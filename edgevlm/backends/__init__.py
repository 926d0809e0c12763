"""Inference backends behind one small interface: run a named graph on feeds."""
