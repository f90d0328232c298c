"""attnreg app: a local Gradio web page for Attention Regulation (`attnreg app`)."""
