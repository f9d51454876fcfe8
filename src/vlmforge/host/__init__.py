"""Host-side facts and arithmetic shared by the build, the validators, the fixtures and the runtime:
3-D positions (mrope), prompt expansion (prompt), image preprocessing (preprocess, image), token ids (tokens),
a fixed size as a side or height x width (sizes).
numpy / PIL only; imports nothing of vlmforge but `vlmforge.core.errors`."""
