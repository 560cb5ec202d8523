"""Reading, checking and preparing volumes and label maps, keeping their geometry."""
