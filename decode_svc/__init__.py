"""The decode stage (see ARCHITECTURE.md); its service lands with its issue."""
