"""The kvstore stage (see ARCHITECTURE.md); its service lands with its issue."""
