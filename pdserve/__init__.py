"""The pdserve command line and every assembly of stages: launcher, stage commands, offline engine, tools."""
