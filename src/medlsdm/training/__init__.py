"""Lightning modules and callbacks for each training stage."""
