return decide(true)
