"""Where rule state lives: the store protocol, the memory and Redis stores, and their codec."""
