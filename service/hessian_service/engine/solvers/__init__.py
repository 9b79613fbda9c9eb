"""Optimisation: CG and trust regions, the Stepper, the Run driver, ask/tell, start points."""
