return decide(false)
