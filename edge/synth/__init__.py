"""Speech synthesis: the engine interface, the engines, and audio encoders."""
