local consume = false -- read-only: what an acquire would answer
