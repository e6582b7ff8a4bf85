"""The judge: compares a candidate's record with a fixture, stage by stage. It runs no model."""
