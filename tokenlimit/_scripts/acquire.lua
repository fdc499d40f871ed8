local consume = true -- admissions take their tokens
